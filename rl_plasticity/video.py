"""Rendering MuJoCo and recording videos of episodes: the OpenGL backend (MUJOCO_GL), the
camera that follows the agent, real-time frame timing, and an exact MP4 writer.

This module imports nothing that loads MuJoCo at import time: the OpenGL backend must be chosen
(`default_gl_backend`, `select_gl_backend`) before dm_control and mujoco are first imported, and
only the entry points (train, evaluate) choose it.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from rl_plasticity.config import ConfigError

# Debian/Ubuntu packages for headless MuJoCo rendering through Mesa (EGL; OSMesa as the fallback).
EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0"
OSMESA_PACKAGES = "libosmesa6"


def default_gl_backend() -> None:
    """EGL when neither MUJOCO_GL nor a display is set.  dm_control picks its renderer when it is
    first imported, and with no display GLFW only warns and then fails; EGL works headless (and
    is never touched unless something renders).  The entry points call this before they import
    any env."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"


# -- rendering --------------------------------------------------------------------------------
_PROBE = ("import os, mujoco\n"
          "ctx = mujoco.GLContext(16, 16)\nctx.make_current()\nprint('rendering-ok', flush=True)\nos._exit(0)\n")


def _backend_works(backend: str) -> bool:
    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)  # mujoco sets it to match MUJOCO_GL
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "rendering-ok" in done.stdout


def _install_hint() -> str:
    return (f"headless MuJoCo rendering needs EGL (Debian/Ubuntu: apt-get install {EGL_PACKAGES}) or "
            f"OSMesa (apt-get install {OSMESA_PACKAGES}), or a display with MUJOCO_GL=glfw")


def select_gl_backend() -> str:
    """Choose MuJoCo's OpenGL backend for rendering, before dm_control or mujoco is imported.

    A MUJOCO_GL set by the user is kept (and checked).  Otherwise EGL if it renders here, else
    OSMesa (else GLFW when a display exists); each is tried in a subprocess, since a backend cannot
    be changed once mujoco has loaded one.  None working is a ConfigError saying what to install.
    """
    if "mujoco" in sys.modules or "dm_control" in sys.modules:
        return os.environ.get("MUJOCO_GL", "")  # already loaded with its choice: nothing can change it now
    if os.environ.get("MUJOCO_GL"):
        chosen = os.environ["MUJOCO_GL"]
        if not _backend_works(chosen):
            raise ConfigError(f"MUJOCO_GL={chosen} (set in the environment) cannot render here: unset it to let "
                              f"evaluate choose, or fix it; {_install_hint()}")
        return chosen
    candidates = ["egl", "osmesa"] + (["glfw"] if os.environ.get("DISPLAY") else [])
    for backend in candidates:
        if _backend_works(backend):
            os.environ["MUJOCO_GL"] = backend
            return backend
    raise ConfigError(f"no OpenGL backend renders MuJoCo here (tried MUJOCO_GL={', '.join(candidates)}): "
                      f"{_install_hint()}")


# dm_control suite cameras that follow the agent, as DrQ-v2 films the suite: camera 0 (`side`,
# `back`, `tracking_top`, ... mode trackcom) in every domain but quadruped, whose camera 0 tracks
# the whole scene from afar; its camera 2 (`y`) follows the torso.  Domains that do not move
# (cartpole, finger, reacher, manipulator, ...) have a fixed camera 0 that frames the whole task.
DMC_TRACKING_CAMERA = {"quadruped": 2}
MAX_VIDEO_FPS = 60.0


def dmc_camera(domain: str) -> int:
    """The camera a video of a dm_control suite `domain` is rendered from (see DMC_TRACKING_CAMERA)."""
    return DMC_TRACKING_CAMERA.get(domain, 0)


def render_options(env_cfg: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """`make_env` keyword arguments for recording `env_cfg` at width x height from a camera that
    follows the agent.  gymnasium's MuJoCo envs (Slippery Ant's Ant-v5) already render from the
    model's `track` camera (trackcom on the torso) when none is named; dm_control renders from its
    free camera, fixed at the origin, unless given one, so DMC tasks get `dmc_camera(domain)`."""
    options: dict[str, Any] = {"render_mode": "rgb_array", "render_size": (width, height)}
    kind = env_cfg.get("kind", "dmc")
    if kind == "dmc":
        options["render_kwargs"] = {"camera_id": dmc_camera(str(env_cfg["domain"]))}
    elif kind == "continual_dmc" and env_cfg.get("tasks"):  # one domain: its camera for every task
        options["render_kwargs"] = {"camera_id": dmc_camera(str(env_cfg["tasks"][0]).split("-", 1)[0])}
    return options


def video_timing(env: Any, action_repeat: int) -> tuple[int, float]:
    """(stride, fps): record every `stride`-th agent step and play the frames at `fps`, so that the
    video runs in real time at no more than MAX_VIDEO_FPS frames per second.

    An agent step lasts the env's control timestep times `action_repeat` (DMC cheetah-run: 10 ms,
    100 steps/s, so every 2nd step at 50 fps; walker-run 25 ms: every step at 40 fps; Ant-v5 50 ms:
    every step at 20 fps).  Without a timestep the env's `render_fps` metadata (else 30) is used."""
    unwrapped = env.unwrapped
    dt = getattr(unwrapped, "dt", None)
    if dt is None and hasattr(getattr(unwrapped, "_env", None), "control_timestep"):
        dt = unwrapped._env.control_timestep()
    rate = float(env.metadata.get("render_fps") or 30) if not dt else 1.0 / float(dt)
    rate /= action_repeat
    stride = max(1, math.ceil(rate / MAX_VIDEO_FPS - 1e-9))
    return stride, rate / stride


def record_episodes(env: Any, path: Path, cfg: Any, action_repeat: int) -> tuple[Any, list[Path]]:
    """Wrap `env` in gymnasium's RecordVideo for the first `cfg.video_episodes` of `cfg.episodes`
    episodes (into `cfg.video_dir`, else beside the checkpoint `path`), after checking that it
    renders (so a missing OpenGL library is one clear error, not a failure mid-episode)."""
    try:
        env.reset()
        frame = env.render()
    except Exception as e:  # noqa: BLE001  (any renderer failure: missing library, no device, ...)
        env.close()
        if type(e).__name__ == "DependencyNotInstalled":  # gymnasium: e.g. pygame for classic-control envs
            raise ConfigError(f"this env cannot render: {e}") from None
        raise ConfigError(f"rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL', '')}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. {_install_hint()}") from None
    if getattr(frame, "ndim", 0) != 3:
        env.close()
        raise ConfigError(f"env {env.spec.id if env.spec else env} renders no RGB frames, so it cannot be recorded")
    folder = Path(cfg.video_dir) if cfg.video_dir else path.parent / "videos"
    prefix = path.name[:-3] if path.name.endswith(".pt") else path.name
    count = min(cfg.video_episodes, cfg.episodes)
    stride, fps = video_timing(env, action_repeat)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overwriting existing videos.*")
        wrapped = _exact_record_video()(env, str(folder), episode_trigger=lambda k: k < count, name_prefix=prefix,
                                        fps=fps, disable_logger=True)
    wrapped.stride = stride
    return wrapped, [folder / f"{prefix}-episode-{k}.mp4" for k in range(count)]


def _exact_record_video() -> type:
    """gymnasium's RecordVideo, keeping every `stride`-th frame and writing every kept frame.

    The frame of the reset and then those after every `stride`-th step are rendered (the others
    are not: rendering costs more than a step).  RecordVideo encodes through moviepy's ImageSequenceClip, which sums n frame durations of 1/fps
    in floating point and then takes int(duration * fps) frames: often n - 1, the last frame lost
    (moviepy 2.2).  Here the frames RecordVideo captured go to imageio-ffmpeg (which moviepy uses
    underneath) one by one; RecordVideo's triggers, naming and capture are unchanged.
    """
    import gc

    import gymnasium as gym
    import numpy as np

    class ExactRecordVideo(gym.wrappers.RecordVideo):
        stride = 1
        _captures = 0  # frames offered since the recording started

        def start_recording(self, video_name: str) -> None:
            super().start_recording(video_name)
            self._captures = 0

        def _capture_frame(self) -> None:
            self._captures += 1
            if (self._captures - 1) % self.stride == 0:
                super()._capture_frame()

        def stop_recording(self) -> None:
            assert self.recording, "stop_recording was called, but no recording was started"
            if self.recorded_frames:
                import imageio_ffmpeg

                height, width = self.recorded_frames[0].shape[:2]
                writer = imageio_ffmpeg.write_frames(os.path.join(self.video_folder, f"{self._video_name}.mp4"),
                                                     (width, height), fps=self.frames_per_sec, codec="libx264",
                                                     macro_block_size=2, ffmpeg_log_level="error")
                writer.send(None)
                for frame in self.recorded_frames:
                    writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
                writer.close()
            self.recorded_frames = []
            self.recording = False
            self._video_name = None
            if self.gc_trigger and self.gc_trigger(self.episode_id):
                gc.collect()

    return ExactRecordVideo
