"""The Gradio demo: ``python demo/app.py [--model DIR] [--port 7860] [--share]`` (same as ``vlm-accel demo``)."""

from vlm_accel.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
