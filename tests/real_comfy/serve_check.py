"""Check the pack inside a running ComfyUI server on loopback: node definitions, workflows, frontend.

This is a manual check, not a pytest module. It needs a throwaway ComfyUI with this repository
linked as ``custom_nodes/ComfyUI-DreamCache``. That ComfyUI needs ``v2-1_512-ema-pruned.safetensors``
in ``models/checkpoints``, ``dreamcache_sd21.safetensors`` in ``models/dreamcache`` (the files that
``checkpoint_factory.py`` writes are enough) and ``examples/dog_reference.jpg`` in ``input/``. Start it
with ``python main.py --cpu --listen 127.0.0.1 --port 8199``, then run, with ComfyUI's Python
(the script uses aiohttp)::

    python tests/real_comfy/serve_check.py --url http://127.0.0.1:8199 --screenshots /tmp/shots

It checks that:

* ``/object_info`` lists the pack's five core nodes, each with a description and a tooltip on
  every input and output;
* every ``workflows/*.api.json``, queued through ``POST /prompt`` at 64x64 pixels and 2 steps,
  completes with status ``success`` in ``/history`` and reports every output node (graphs with
  Save DreamCache run first, so that Load DreamCache finds their cache);
* every UI workflow loads in headless Chromium without the frontend's missing-node dialog, and
  the frontend's own ``graphToPrompt`` gives the same node types and inputs as the API copy. A
  screenshot of each goes to ``--screenshots``. A copy with an unknown node type must show the
  dialog, which proves that the detection works.

Chromium gets a host-resolver rule and a dead loopback proxy, so the page can reach only the
loopback server. The script exits with status 1 and lists every failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid

import aiohttp

logger = logging.getLogger("serve_check")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO_ROOT / "workflows"
CORE_NODES = ("DreamCacheAdapterLoader", "DreamCacheBuild", "DreamCacheSave", "DreamCacheLoad", "DreamCacheApply")
MISSING_NODES_TEXTS = ("Some Nodes Are Missing", "following node types were not found")
SMALL_PIXELS = 64
SMALL_STEPS = 2
UNKNOWN_NODE_TYPE = "DreamCacheNodeThatDoesNotExist"


def shrink(prompt: dict) -> dict:
    """Return a copy of an API prompt at 64x64 pixels, 2 steps and 64-pixel references."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["width"] = node["inputs"]["height"] = SMALL_PIXELS
        elif node["class_type"] in ("KSampler", "BasicScheduler"):
            node["inputs"]["steps"] = SMALL_STEPS
        elif node["class_type"] == "DreamCacheBuild":
            node["inputs"]["resolution"] = SMALL_PIXELS
    return prompt


def check_node_definitions(object_info: dict) -> list[str]:
    """Return the problems in the pack's node definitions from ``/object_info``."""
    problems = [f"node {node_id} is not registered" for node_id in CORE_NODES if node_id not in object_info]
    pack_nodes = {node_id: info for node_id, info in object_info.items() if info.get("category") == "DreamCache"}
    for node_id, info in sorted(pack_nodes.items()):
        if not info.get("description"):
            problems.append(f"node {node_id} has no description")
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not options.get("tooltip"):
                    problems.append(f"input {node_id}.{name} has no tooltip")
        tooltips = info.get("output_tooltips") or []
        if len(tooltips) != len(info.get("output", [])) or not all(tooltips):
            problems.append(f"node {node_id} has {len(tooltips)} output tooltips for outputs {info.get('output')}")
    logger.info("object_info: %d DreamCache nodes: %s", len(pack_nodes), ", ".join(sorted(pack_nodes)))
    return problems


async def queue_and_wait(session: aiohttp.ClientSession, url: str, name: str, prompt: dict,
                         timeout_s: float) -> list[str]:
    """Queue ``prompt``, poll ``/history`` until it finishes and return the problems found."""
    started = time.monotonic()
    async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": str(uuid.uuid4())}) as response:
        body = await response.json()
    if response.status != 200 or body.get("node_errors"):
        return [f"{name}: POST /prompt returned {response.status}: {json.dumps(body)[:2000]}"]
    prompt_id = body["prompt_id"]

    while time.monotonic() - started < timeout_s:
        async with session.get(f"{url}/history/{prompt_id}") as response:
            history = await response.json()
        if prompt_id in history:
            break
        await asyncio.sleep(1.0)
    else:
        return [f"{name}: prompt {prompt_id} timed out after {timeout_s:.0f} s"]

    entry = history[prompt_id]
    status = entry.get("status", {})
    elapsed = time.monotonic() - started
    if status.get("status_str") != "success" or not status.get("completed"):
        errors = [message for message in status.get("messages", []) if message[0] == "execution_error"]
        return [f"{name}: prompt {prompt_id} finished with status {status.get('status_str')!r}: {errors}"]

    output_nodes = sorted(entry.get("outputs", {}))
    logger.info("%s: prompt %s succeeded in %.1f s, outputs %s", name, prompt_id, elapsed,
                {node_id: entry["outputs"][node_id] for node_id in output_nodes})
    if not output_nodes:
        return [f"{name}: prompt {prompt_id} reported no outputs"]
    return []


class DevToolsPage:
    """A Chromium page driven through the DevTools protocol over one websocket."""

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse):
        self.websocket = websocket
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        request_id = self.next_id
        await self.websocket.send_json({"id": request_id, "method": method, "params": params})
        while True:
            message = await self.websocket.receive_json()
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        """Evaluate ``expression`` (awaited if it is a promise) and return its JSON value."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"page condition {expression!r} timed out after {timeout_s:.0f} s")

    async def screenshot(self, path: pathlib.Path) -> None:
        result = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(result["data"]))


def start_chromium(binary: str, profile: str) -> subprocess.Popen:
    """Start headless Chromium with a DevTools port, able to reach only loopback addresses."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
               f"--user-data-dir={profile}", "about:blank"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def devtools_page_url(profile: str, timeout_s: float = 30.0) -> str:
    """Return the websocket URL of Chromium's first page, read from the DevToolsActivePort file."""
    port_file = pathlib.Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Chromium wrote no {port_file} within {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
    return next(target["webSocketDebuggerUrl"] for target in targets if target["type"] == "page")


def compare_with_api(name: str, frontend_prompt: dict, api: dict) -> list[str]:
    """Return the differences between the frontend's API conversion of a UI workflow and the API copy."""
    problems = []
    if set(frontend_prompt) != set(api):
        return [f"{name}: frontend gives nodes {sorted(frontend_prompt)}, API copy has {sorted(api)}"]
    for node_id, node in api.items():
        converted = frontend_prompt[node_id]
        if converted["class_type"] != node["class_type"]:
            problems.append(f"{name}: node {node_id} is {converted['class_type']} in the frontend, "
                            f"{node['class_type']} in the API copy")
        if converted["inputs"] != node["inputs"]:
            problems.append(f"{name}: node {node_id} inputs differ: frontend {converted['inputs']}, "
                            f"API copy {node['inputs']}")
    return problems


async def load_in_frontend(page: DevToolsPage, url: str, name: str, workflow: dict,
                           screenshot: pathlib.Path | None) -> tuple[bool, dict]:
    """Open the frontend, load ``workflow`` and return (missing-node dialog shown, graphToPrompt output)."""
    await page.call("Page.navigate", url=url)
    await page.wait_for("Boolean(window.app && window.app.graph && document.querySelector('canvas'))", 120)
    await page.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    await asyncio.sleep(2.0)
    text = await page.evaluate("document.body.innerText")
    dialog_shown = any(marker in text for marker in MISSING_NODES_TEXTS)
    if screenshot is not None:
        await page.screenshot(screenshot)
        logger.info("%s: screenshot %s", name, screenshot)
    converted = await page.evaluate("window.app.graphToPrompt().then(result => result.output)")
    return dialog_shown, converted


async def check_frontend(url: str, chromium: str, screenshots: pathlib.Path | None) -> list[str]:
    """Load every UI workflow in headless Chromium and return the problems found."""
    problems = []
    profile = tempfile.mkdtemp(prefix="dreamcache-chromium-")
    process = start_chromium(chromium, profile)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(await devtools_page_url(profile), max_msg_size=0) as websocket:
                page = DevToolsPage(websocket)
                await page.call("Page.enable")
                await page.call("Runtime.enable")
                for ui_path in sorted(WORKFLOW_DIR.glob("*.json")):
                    if ui_path.name.endswith(".api.json"):
                        continue
                    name = ui_path.stem
                    workflow = json.loads(ui_path.read_text(encoding="utf-8"))
                    api = json.loads((WORKFLOW_DIR / f"{name}.api.json").read_text(encoding="utf-8"))
                    shot = screenshots / f"{name}.png" if screenshots else None
                    dialog_shown, converted = await load_in_frontend(page, url, name, workflow, shot)
                    if dialog_shown:
                        problems.append(f"{name}: the frontend shows the missing-node dialog")
                    problems += compare_with_api(name, converted, api)
                    logger.info("%s: loaded in the frontend, missing-node dialog shown: %s", name, dialog_shown)

                control = json.loads((WORKFLOW_DIR / "dreamcache_basic.json").read_text(encoding="utf-8"))
                control["nodes"][0]["type"] = UNKNOWN_NODE_TYPE
                shot = screenshots / "control_unknown_node.png" if screenshots else None
                dialog_shown, _ = await load_in_frontend(page, url, "control", control, shot)
                logger.info("control with %s: missing-node dialog shown: %s", UNKNOWN_NODE_TYPE, dialog_shown)
                if not dialog_shown:
                    problems.append("control: a workflow with an unknown node type did not show the missing-node "
                                    "dialog, so its absence above proves nothing")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return problems


async def run_checks(url: str, chromium: str | None, screenshots: pathlib.Path | None, timeout_s: float) -> list[str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/object_info") as response:
            problems = check_node_definitions(await response.json())

        api_paths = sorted(WORKFLOW_DIR.glob("*.api.json"))
        prompts = {path.name[: -len(".api.json")]: json.loads(path.read_text(encoding="utf-8")) for path in api_paths}
        # Graphs that save a cache run first, so a graph that loads it finds the file.
        order = sorted(prompts, key=lambda name: (not any(node["class_type"] == "DreamCacheSave"
                                                          for node in prompts[name].values()), name))
        for name in order:
            problems += await queue_and_wait(session, url, name, shrink(prompts[name]), timeout_s)

    if chromium:
        problems += await check_frontend(url, chromium, screenshots)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8199", help="ComfyUI server URL (loopback only)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium binary for the frontend check (default: chromium on PATH). Without one "
                             "the frontend check is skipped.")
    parser.add_argument("--screenshots", type=pathlib.Path, help="folder for one PNG screenshot per UI workflow")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each queued prompt")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if not arguments.url.startswith("http://127.0.0.1:"):
        raise SystemExit(f"--url {arguments.url!r} is invalid: this check talks only to http://127.0.0.1:PORT.")
    if arguments.screenshots:
        os.makedirs(arguments.screenshots, exist_ok=True)
    if not arguments.chromium:
        logger.warning("No Chromium found; the frontend check is skipped. Pass --chromium PATH to run it.")

    problems = asyncio.run(run_checks(arguments.url.rstrip("/"), arguments.chromium, arguments.screenshots,
                                      arguments.timeout))
    for problem in problems:
        logger.error("FAILED: %s", problem)
    logger.info("%d problem(s)", len(problems))
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
