"""What the scheduler and the worker both use: settings, models, Redis keys."""
