"""ComfyUI workflow tooling, kept out of the neutral core (``safetydpo_core`` never deals with ComfyUI).

It owns the ComfyUI-specific tools that work on workflow files without running ComfyUI:

* :mod:`.workflow_api`: a UI-format workflow (what the frontend saves) -> the API format (what ``POST /prompt``
  runs), and the checks a shipped workflow must pass, against node definitions in ``/object_info`` form: a
  running ComfyUI's, this pack's own (its ``__init__.py`` loaded by file path with ``comfy`` and
  ``folder_paths`` hidden) and the kept ComfyUI 0.8.0 core nodes (``comfy_core_nodes.json``);
* :mod:`.cli`: the ``safetydpo workflow`` sub-command (``to-api``, ``check``), which the ``safetydpo`` command
  table (``safetydpo_core/cli/main.py``) dispatches to.

Installed beside ``safetydpo_core`` (pyproject.toml) and imports it absolutely (``safetydpo_core.errors``);
the ComfyUI nodes never import this package.
"""
