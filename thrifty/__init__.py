"""thrifty: cheap calls for embodied planners and policies, measured in closed loop."""

__version__ = "0.1.0"
