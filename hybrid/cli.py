"""Small command-line helpers: ``hybrid-layers`` (also ``hybrid-train --list-layers``)."""

from __future__ import annotations

from hybrid.registry import list_layers


def print_layers() -> None:
    """Print every registered mixer, FFN and norm with its config fields and defaults, and the
    default pattern symbols."""
    from hybrid.pattern import DEFAULT_SYMBOLS

    for kind, entries in list_layers().items():
        print(f"{kind}s:")
        for e in entries:
            flag = " [attention]" if e["attention"] else ""
            print(f"  {e['name']}{flag}: {e['summary']}")
            for field, default in e["fields"].items():
                print(f"      {field} = {default!r}")
    print("pattern symbols (default table; redefine any under model.symbols):")
    for sym, spec in DEFAULT_SYMBOLS.items():
        print(f"  {sym}: {dict(spec)}")


def list_layers_main() -> None:
    print_layers()
