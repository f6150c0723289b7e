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

**Zero-copy on shared memory.** On a backend with ``receive_view()`` (``shm``),
processing and sink nodes decode each message straight from shared memory:
the arrays ``process()``/``on_message()`` get point into the publisher's frame,
no copy made (``NodeConfig(zero_copy=False)`` receives bytes instead). Their
lifetime:

* During the callback the arrays are read-only (writing raises ``ValueError``)
  and the frame cannot be overwritten.
* A message object kept beyond the callback (stored, queued to another thread)
  is copied out when the callback returns: it stays valid and read-only, and
  no longer holds shared memory. Only kept messages pay for the copy.
* A bare array kept beyond the callback (``self.last = data.image``) keeps its
  frame in shared memory, valid and never overwritten, until it is dropped. At
  most ``MSIGHT_SHM_MAX_VIEWS`` frames can be held so; beyond that the node
  receives copies (and logs a warning) until some are dropped. Keep
  ``data.image.copy()`` to hold an array without holding shared memory.

Other backends hand nodes ``bytes`` as before.
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
