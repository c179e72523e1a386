"""Prints the `video_pipeline` / `audio_pipeline` lines of the `tour` source in the bundled
config.toml: four AV-Synth scenes of 10 s each (wheel_clicks, rings_tone, ball_buzz,
background) joined by `concat`, with snow and pink noise mixed in, and a live black / silent
source at zero weight that makes the whole pipeline live (real-time, 40 s, then restarted).

    python3 avsynth/demo_tour.py
"""
W, H, FPS, SEC = 160, 120, 15, 10
V = f"video/x-raw,format=I420,width={W},height={H},framerate={FPS}/1"
A = "audio/x-raw,format=F32LE,rate=16000,channels=1"
nv = FPS * SEC
na = 16000 * SEC // 1024  # 1024-sample buffers
vs = [
  f"videotestsrc num-buffers={nv} pattern=spokes horizontal-speed=2 foreground-color=0xfff0f040 background-color=0xff301020 ! {V} ! v.",
  f"videotestsrc num-buffers={nv} pattern=zone-plate kx2=24 ky2=24 kt=4 ! {V} ! t.sink_0  videotestsrc num-buffers={nv} pattern=solid-color foreground-color=0xff40c0ff ! {V} ! t.sink_1  compositor name=t sink_1::alpha=0.4 ! {V} ! v.",
  f"videotestsrc num-buffers={nv} pattern=ball motion=sweep foreground-color=0xffff6060 background-color=0xff103010 ! {V} ! v.",
  f"videotestsrc num-buffers={nv} pattern=gradient foreground-color=0xff8080c0 background-color=0xff202030 ! {V} ! v.",
]
video = "  ".join(vs) + f"  concat name=v ! c.sink_0  videotestsrc num-buffers={4*nv} pattern=snow ! {V} ! c.sink_1  videotestsrc is-live=true num-buffers={4*nv} pattern=black ! {V} ! c.sink_2  compositor name=c sink_1::alpha=0.12 sink_2::alpha=0 ! {V}"
as_ = [
  f"audiotestsrc num-buffers={na} wave=ticks freq=3000 sine-periods-per-tick=9 tick-interval=100000000 volume=0.5 ! {A} ! a.",
  f"audiotestsrc num-buffers={na} wave=sine freq=660 volume=0.25 ! {A} ! a.",
  f"audiotestsrc num-buffers={na} wave=square freq=220 volume=0.1 ! {A} ! a.",
  f"audiotestsrc num-buffers={na} wave=sine freq=440 volume=0 ! {A} ! a.",
]
audio = "  ".join(as_) + f"  concat name=a ! m.  audiotestsrc num-buffers={4*na} wave=pink-noise volume=0.02 ! {A} ! m.  audiotestsrc is-live=true num-buffers={4*na} wave=silence ! {A} ! m.  audiomixer name=m ! {A}"
import json, sys
print("video_pipeline =", json.dumps(video))
print("audio_pipeline =", json.dumps(audio))
