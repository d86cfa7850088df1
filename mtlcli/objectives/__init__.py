"""Training objectives that add terms and parameters of their own on top of a scheme's task losses
(CrossDistil's teachers, calibrators and distillation). Not yet selectable from a recipe."""
