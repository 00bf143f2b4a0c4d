"""Training: the Lightning modules (fine-tuning, distillation), the best-epoch fit, and DDP."""
