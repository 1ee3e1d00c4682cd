"""``python -m attnc`` is the ``attnc`` command."""
import sys

from .cli import main

sys.exit(main())
