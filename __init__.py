"""orsgen: build open-world referring-segmentation datasets with Apache Beam."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("orsgen")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
