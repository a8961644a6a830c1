source scripts/device_setup.sh dbg >/dev/null
python scripts/debug_gluon_dk.py --scan 2>&1 | grep -v -i warn
for s in 1x128x4 2x1000x8; do for mode in store atomic; do
  CUDA_LAUNCH_BLOCKING=1 timeout 120 python scripts/debug_gluon_dk.py --shapes $s --modes $mode 2>&1 | grep -v -i warn | grep -v "^ *File\|^    " | tail -40
done; done
CUDA_LAUNCH_BLOCKING=1 timeout 120 python scripts/debug_gluon_dk.py --shapes 8x4096x32 --modes atomic --nb 32 --rot 1 2>&1 | grep -v -i warn | tail -20
