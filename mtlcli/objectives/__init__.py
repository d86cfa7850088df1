"""Training objectives that add terms and parameters of their own on top of a scheme's task losses
(CrossDistil's teachers, calibrators and distillation), named by a recipe's ``objective``
section: the contract in ``base``, CrossDistil's formulas in ``crossdistil`` and its objective and
step in ``training``."""
