"""Load DreamCache Adapter: an adapter file from ``models/dreamcache``."""

import folder_paths

from dreamcache_core.adapter_io import load_adapter
from dreamcache_core.comfy_folders import ADAPTER_FOLDER, file_change_token


class DreamCacheAdapterLoader:
    CATEGORY = "DreamCache"
    RETURN_TYPES = ("DREAMCACHE_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The attention adapters that let the memory layers attend to a subject cache.",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a DreamCache adapter (.safetensors, or a released cross_attention-*.pt for SD 2.1-base)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter_name": (folder_paths.get_filename_list(ADAPTER_FOLDER), {
                "tooltip": "Adapter file in models/dreamcache. A released .pt file is read as an SD 2.1-base "
                           "(epsilon) adapter; every key and shape is checked."}),
        }}

    @classmethod
    def IS_CHANGED(cls, adapter_name):
        # A re-converted or re-trained adapter saved under the same name is read again.
        return file_change_token(ADAPTER_FOLDER, adapter_name)

    def load(self, adapter_name):
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        return (load_adapter(path),)
