"""Nodes: sources, processing nodes and sinks built on data types and a backend.

Example::

    from msight_core.data import ImageData
    from msight_core.nodes import NodeConfig, SourceNode

    class Camera(SourceNode):
        def get_data(self):
            return ImageData(grab_frame(), sensor_name="camera1")

    Camera(NodeConfig(name="cam1", publish_topic_name="camera1.frames",
                      publish_topic_data_type=ImageData, rate=30)).spin()

The backend comes from ``MSIGHT_PUBSUB_BACKEND`` (``get_pubsub(group_id=...)``):
processing nodes with the same ``group_id`` share the load on NATS and Kafka.
"""

from __future__ import annotations

from ._config import ErrorPolicy, NodeConfig, NodeStatus
from ._stats import NodeStats
from .base import DataProcessingNode, Node, ProcessingNode, SinkNode, SourceNode

__all__ = [
    "DataProcessingNode",
    "ErrorPolicy",
    "Node",
    "NodeConfig",
    "NodeStats",
    "NodeStatus",
    "ProcessingNode",
    "SinkNode",
    "SourceNode",
]
