"""``python -m accel_det.report RUN_DIR [--checkpoint best|last|PATH]``: see accel_det/report/cli.py."""

import sys

from accel_det.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
