"""LightningDataModules. They know nothing of distillation."""
