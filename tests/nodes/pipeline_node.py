"""One node of the cross-process pipeline test: ``python pipeline_node.py ROLE ...``.

Roles: ``source NAME TOPIC RATE OUTFILE``, ``processor NAME GROUP IN OUT READYFILE``,
``sink NAME TOPIC OUTFILE READYFILE``. The backend comes from the environment
(``MSIGHT_PUBSUB_BACKEND`` and its settings), as in a deployment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from msight_core.data import Data, DetectionResult, ImageData
from msight_core.nodes import DataProcessingNode, NodeConfig, SinkNode, SourceNode

SHAPE = (683, 1024, 3)  # about 2 MB per frame


class Camera(SourceNode):
    def __init__(self, configs: NodeConfig, out: Path) -> None:
        super().__init__(configs)
        self.count = 0
        self.out = out.open("a")

    def get_data(self) -> ImageData:
        self.count += 1
        return ImageData(np.full(SHAPE, self.count % 251, np.uint8), frame_id=self.count)

    def on_after_iteration(self) -> None:
        self.out.write(f"{self.count}\n")
        self.out.flush()


class Detector(DataProcessingNode):
    def __init__(self, configs: NodeConfig, ready: Path) -> None:
        super().__init__(configs)
        self.ready = ready

    def on_before_spin(self) -> None:
        self.ready.write_text("ready")

    def process(self, data: Data) -> DetectionResult:
        assert isinstance(data, ImageData) and data.image.shape == SHAPE
        expected = data.frame_id % 251
        if data.image[0, 0, 0] != expected or data.image[-1, -1, -1] != expected:
            raise ValueError(f"frame {data.frame_id} arrived corrupted")
        return DetectionResult(
            boxes=[[0, 0, 10, 10]],
            classes=[1],
            scores=[0.9],
            source_frame_id=data.frame_id,
            capture_timestamp=data.capture_timestamp,
            metadata={"by": self.name},
        )


class Recorder(SinkNode):
    def __init__(self, configs: NodeConfig, out: Path, ready: Path) -> None:
        super().__init__(configs)
        self.out = out.open("a")
        self.ready = ready

    def on_before_spin(self) -> None:
        self.ready.write_text("ready")

    def on_message(self, data: Data) -> None:
        assert isinstance(data, DetectionResult)
        self.out.write(f"{data.source_frame_id} {data.metadata['by']}\n")
        self.out.flush()


def main(argv: list[str]) -> None:
    role, name = argv[0], argv[1]
    common = {"name": name, "stats_interval": 2.0, "logging_level": "INFO"}
    if role == "source":
        topic, rate, out = argv[2], float(argv[3]), Path(argv[4])
        cfg = NodeConfig(
            publish_topic_name=topic, publish_topic_data_type=ImageData, rate=rate, **common
        )
        Camera(cfg, out).spin()
    elif role == "processor":
        group, src, dst, ready = argv[2], argv[3], argv[4], Path(argv[5])
        cfg = NodeConfig(
            subscribe_topic_name=src,
            subscribe_topic_data_type=ImageData,
            publish_topic_name=dst,
            publish_topic_data_type=DetectionResult,
            group_id=group,
            **common,
        )
        Detector(cfg, ready).spin()
    elif role == "sink":
        topic, out, ready = argv[2], Path(argv[3]), Path(argv[4])
        cfg = NodeConfig(
            subscribe_topic_name=topic, subscribe_topic_data_type=DetectionResult, **common
        )
        Recorder(cfg, out, ready).spin()
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
