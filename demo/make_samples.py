"""Write ``demo/samples/scenes.mp4``: the demo's bundled clip (8 frames, 2 fps, 224 px, lossless H.264).

Three rendered scenes held for 3, 2 and 3 frames, so the video tab shows the frame cache at work (a repeated frame is
not encoded again). ``python demo/make_samples.py`` (needs PyAV) rewrites it deterministically.
"""

from pathlib import Path

import av
import numpy as np

from vlm_accel.zoo import render_scene

OUT = Path(__file__).resolve().parent / "samples" / "scenes.mp4"


def main() -> None:
    scenes = [np.asarray(render_scene(seed, "heldout").image.convert("RGB").resize((224, 224))) for seed in (1, 2, 3)]
    frames = [scenes[0]] * 3 + [scenes[1]] * 2 + [scenes[2]] * 3
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(OUT), "w") as out:
        stream = out.add_stream("libx264", rate=2, options={"qp": "0", "preset": "veryslow"})
        stream.width, stream.height, stream.pix_fmt = 224, 224, "yuv444p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    print(OUT, OUT.stat().st_size, "bytes")  # noqa: T201


if __name__ == "__main__":
    main()
