"""Training Omni-Attribute: pair data, the generative and contrastive losses, and the accelerate trainer."""
