import sys

from analysis.models.dit_digits.train import main

sys.exit(main())
