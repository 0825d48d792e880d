"""万物 wanwu: an MLOps pipeline for universal object recognition with Chinese labels."""

__version__ = "0.1.0"
