"""Training: contrastive pre-training and TTD fine-tuning."""
