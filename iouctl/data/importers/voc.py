"""Pascal VOC XML (VOC, LabelImg, CVAT): the reader and its conventions live in ``iouctl.data.voc``."""
from iouctl.data.voc import EXPECTED, VOC_KINDS as KINDS, read

__all__ = ["EXPECTED", "KINDS", "read"]
