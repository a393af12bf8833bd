"""Run one probattn command in this process and print its peak memory (RSS) on stderr.

    python scripts/peak_rss.py predict BUNDLE --input-file FILE --json > /dev/null
"""
import resource
import sys

from probattn.export.cli import main

rc = main(sys.argv[1:])
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", file=sys.stderr)
sys.exit(rc)
