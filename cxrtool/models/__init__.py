"""Ground floor: the network (timm backbone + heads) and self-describing checkpoints."""
