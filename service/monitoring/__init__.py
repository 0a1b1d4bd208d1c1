"""Feedback monitoring: per-context BER windows, targets and label-free estimates."""
