"""iouctl: an experimentation toolkit for localization confidence in object detection."""

__version__ = "0.1.0"
