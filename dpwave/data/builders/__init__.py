"""dpwave's TFDS builders (array_record, readable without TensorFlow), by dataset name."""
from dpwave.data.builders.base import DpwaveBuilder, ResolutionConfig
from dpwave.data.builders.coco_captions import CocoCaptions
from dpwave.data.builders.image_folder import ImageFolder, ImageFolderConfig, image_folder_config
from dpwave.data.builders.mm_celeba_hq import MmCelebaHq
from dpwave.data.builders.mnist5k import Mnist5k
from dpwave.data.builders.mnist5k_style import Mnist5kStyle

BUILDERS: dict[str, type[DpwaveBuilder]] = {
    cls.name: cls for cls in (Mnist5k, Mnist5kStyle, MmCelebaHq, CocoCaptions, ImageFolder)}

__all__ = ["BUILDERS", "CocoCaptions", "DpwaveBuilder", "ImageFolder", "ImageFolderConfig",
           "MmCelebaHq", "Mnist5k", "Mnist5kStyle", "ResolutionConfig", "image_folder_config"]
