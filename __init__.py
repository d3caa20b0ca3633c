"""ComfyUI-SafetyDPO: safety-align the loaded text-to-image model with SafetyDPO, as ComfyUI nodes.

ComfyUI imports this file as the pack's entry point (under a module name derived from the folder path);
everything else is imported relatively. Importing the pack imports no ComfyUI module, loads no model and
downloads nothing; optional extras (NudeNet, gguf) are imported only by the node that needs them, which
says what to install if they are missing. The nodes are described in README.md (section "ComfyUI nodes").
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain file, not as a package: pytest does this with a test tree's root __init__.py when
    # the folder's name is not a Python name (e.g. a clone named "ComfyUI-SafetyDPO"). There is no package to
    # import the nodes relative to, and nothing to register.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# the frontend extension (web/safetydpo_live.js: live training view, merge report), served by ComfyUI under
# /extensions/<pack folder>/
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
