"""``python -m arks_ray.models``: the download Job's command (see ``arks_ray.models.job``)."""

import sys

from arks_ray.models.job import main

sys.exit(main())
