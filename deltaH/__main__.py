"""``python -m deltaH ...`` is the ``deltah`` command (``torchrun -m deltaH run ...`` shares one run)."""

from deltaH.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
