import sys

from buildseg.cli import main

sys.exit(main())
