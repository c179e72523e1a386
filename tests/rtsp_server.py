#!/usr/bin/env python3
"""A real RTSP server for the capture tests: one media at rtsp://127.0.0.1:PORT/stream with
H.264 video (videotestsrc -> x264enc tune=zerolatency -> rtph264pay) and audio
(audiotestsrc sine -> alawenc -> rtppcmapay, PCMA, which is 8 kHz only; or rtpL16pay, L16 at
any rate), served by GstRtspServer on loopback only. Run it with the system python3, which
has PyGObject (python3-gi).

Resolution, frame rate, audio rate and tone frequency come from the command line, so a test
can restart it with other formats on the same port. It prints "ready PORT" once it listens.
It checks its own packages first and exits 2 naming the one that is missing: a test that
needs it must fail, not skip. It does no decoding; the client side is the daemon's capture.
"""

import argparse
import sys


def missing(package, what):
    print(f"rtsp_server.py: {what} is missing: apt-get install {package}", file=sys.stderr)
    sys.exit(2)


try:
    import gi
except ImportError:
    missing("python3-gi", "PyGObject (gi)")
try:
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError):
    missing("gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp", "GstRtspServer (GObject introspection)")

ELEMENTS = {
    "videotestsrc": "gstreamer1.0-plugins-base",
    "audiotestsrc": "gstreamer1.0-plugins-base",
    "x264enc": "gstreamer1.0-plugins-ugly",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "alawenc": "gstreamer1.0-plugins-good",
    "rtppcmapay": "gstreamer1.0-plugins-good",
    "rtpL16pay": "gstreamer1.0-plugins-good",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--audio-codec", choices=["pcma", "l16"], default="pcma")
    parser.add_argument("--audio-rate", type=int, default=8000)
    parser.add_argument("--freq", type=float, default=440.0)
    parser.add_argument("--pattern", default="smpte")
    # vp8: a camera that does not send H.264 (vp8enc and rtpvp8pay: plugins-good).
    parser.add_argument("--video-codec", choices=["h264", "vp8"], default="h264")
    args = parser.parse_args()

    if args.audio_codec == "pcma" and args.audio_rate != 8000:
        parser.error("rtppcmapay takes 8000 Hz only; use --audio-codec l16 for other rates")
    Gst.init(None)
    for element, package in ELEMENTS.items():
        if Gst.ElementFactory.find(element) is None:
            missing(package, f"GStreamer element {element}")

    if args.audio_codec == "pcma":
        audio = "alawenc ! rtppcmapay name=pay1 pt=8"
    else:
        # A dynamic payload type: the SDP carries L16's rate and channels.
        audio = "audioconvert ! audio/x-raw,format=S16BE ! rtpL16pay name=pay1 pt=97"
    if args.video_codec == "h264":
        video = (
            f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} bframes=0 "
            "! rtph264pay name=pay0 pt=96 config-interval=1"
        )
    else:
        video = f"vp8enc deadline=1 keyframe-max-dist={args.fps} ! rtpvp8pay name=pay0 pt=96"
    launch = (
        f"( videotestsrc is-live=true pattern={args.pattern} "
        f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
        f"! {video} "
        f"audiotestsrc is-live=true wave=sine freq={args.freq} volume=0.5 samplesperbuffer=160 "
        f"! audio/x-raw,rate={args.audio_rate},channels=1 ! {audio} )"
    )
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        print(f"rtsp_server.py: cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        sys.exit(1)
    print(f"ready {args.port}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
