"""`python -m jaxtune.cli.assets`: shell assignments of the quickstart's model and data, for
scripts/quickstart.sh (`eval "$(python -m jaxtune.cli.assets)"`)."""

from __future__ import annotations

from jaxtune.assets import quickstart_assets


def main() -> None:
    a = quickstart_assets()
    print(f"MODEL='{a.model}'\nTRAIN='{a.train}'\nHELD_OUT='{a.heldout}'\nORIGIN='{a.origin}'")


if __name__ == "__main__":
    main()
