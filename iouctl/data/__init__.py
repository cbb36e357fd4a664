"""Datasets: the built-in ``shapes`` dataset, COCO-format readers with validation, VOC/YOLO/CSV importers, previews."""
from iouctl.data.coco import (
    CocoData,
    CocoDetectionDataset,
    DatasetError,
    ValidationReport,
    collate_detection,
    validate_coco,
)
from iouctl.data.importers import import_dataset
from iouctl.data.preview import render_preview
from iouctl.data.shapes import ShapesData, ShapesError
from iouctl.data.voc import VOC_CLASSES, convert_voc

__all__ = [
    "CocoData", "CocoDetectionDataset", "DatasetError", "ShapesData", "ShapesError", "VOC_CLASSES",
    "ValidationReport", "collate_detection", "convert_voc", "import_dataset", "render_preview",
    "validate_coco",
]
