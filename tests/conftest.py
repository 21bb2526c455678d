"""Test-suite selection: the no-ComfyUI suite always runs; tests/real_comfy runs when COMFYUI_PATH is set."""

import os

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")



def comfy_available() -> bool:
    return bool(COMFYUI_PATH) and os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py"))


# Without ComfyUI the real-ComfyUI suite is not even imported.
collect_ignore_glob = [] if comfy_available() else ["real_comfy"]


def pytest_report_header(config):
    if comfy_available():
        return f"DreamCache suites: no-ComfyUI + real-ComfyUI (COMFYUI_PATH={COMFYUI_PATH})"
    if COMFYUI_PATH:
        return f"DreamCache suites: no-ComfyUI only (COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout)"
    return "DreamCache suites: no-ComfyUI only (set COMFYUI_PATH to a ComfyUI checkout to run tests/real_comfy)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(pytest_report_header(config))
