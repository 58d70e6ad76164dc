import sys

from vipe_ray.cli import main

sys.exit(main())
