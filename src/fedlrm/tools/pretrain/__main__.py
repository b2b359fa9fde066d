"""`python -m fedlrm.tools.pretrain`: the recipe, as `fedlrm pretrain` runs it."""

import sys

from fedlrm.tools.pretrain.recipe import main

sys.exit(main())
