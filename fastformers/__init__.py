"""fastformers: config-driven FastFormers recipes (distil, prune, quantize) with measured speed and accuracy."""
