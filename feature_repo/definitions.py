"""Card-transaction features for fraud scoring: the only place freshet features are declared.

Plain Feast objects. The stream engine, the offline backfill, serving and the monitor
all read these from the Feast registry after `feast apply`.
"""

import os
from datetime import timedelta

from feast import Entity, Field, FileSource, KafkaSource, ValueType
from feast.aggregation import Aggregation
from feast.data_format import JsonFormat, ParquetFormat
from feast.feature_service import FeatureService
from feast.stream_feature_view import StreamFeatureView
from feast.types import Float64, Int64, String

DATA_DIR = os.environ.get("FRESHET_DATA_DIR", "data")
# the offline store (FRESHET_OFFLINE_STORE): a directory, or s3://bucket/prefix shared by every host
OFFLINE = os.environ.get("FRESHET_OFFLINE_STORE") or f"{DATA_DIR}/offline"
TRANSACTIONS_TOPIC = os.environ.get("FRESHET_TRANSACTIONS_TOPIC", "transactions")

card = Entity(name="card", join_keys=["card_id"], value_type=ValueType.STRING,
              description="A payment card")
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type=ValueType.STRING,
                  description="A merchant accepting card payments")

# What one event on the transactions topic carries (Spark DDL, as Feast expects).
TRANSACTION_SCHEMA = (
    "transaction_id string, card_id string, merchant_id string, amount double, "
    "country string, channel string, event_ts timestamp"
)


def _transactions(view: str) -> KafkaSource:
    """The transactions topic, seen by one view; its batch source is that view's feature log."""
    return KafkaSource(
        name=f"transactions_for_{view}",
        kafka_bootstrap_servers=os.environ.get("FRESHET_KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        topic=TRANSACTIONS_TOPIC,
        timestamp_field="event_ts",
        message_format=JsonFormat(schema_json=TRANSACTION_SCHEMA),
        # Allowed lateness: events older than (max event time - this) are dead-lettered.
        watermark_delay_threshold=timedelta(seconds=30),
        # Producers key events by card_id with Kafka's murmur2 partitioner, so card views
        # are computed where the events land; other views go through a repartition topic.
        tags={"freshet.message_key": "card_id"},
        batch_source=FileSource(
            name=f"{view}_log",
            path=f"{OFFLINE}/features/{view}",
            file_format=ParquetFormat(),
            timestamp_field="event_ts",
        ),
    )


WINDOWS = (timedelta(minutes=5), timedelta(hours=1), timedelta(days=1))
# Sliding windows step by a minute; the day window by 5 minutes.
SLIDES = {timedelta(minutes=5): timedelta(minutes=1), timedelta(hours=1): timedelta(minutes=1),
          timedelta(days=1): timedelta(minutes=5)}


def _aggregations(spec: list[tuple[str, str]]) -> tuple[list[Aggregation], list[Field]]:
    aggs, fields = [], []
    for window in WINDOWS:
        for column, function in spec:
            agg = Aggregation(column=column, function=function, time_window=window,
                              slide_interval=SLIDES[window])
            aggs.append(agg)
            dtype = Int64 if function in ("count", "count_distinct") else Float64
            fields.append(Field(name=agg.resolved_name(window), dtype=dtype))
    return aggs, fields


_card_aggs, _card_fields = _aggregations([
    ("amount", "count"), ("amount", "sum"), ("amount", "mean"), ("amount", "min"),
    ("amount", "max"), ("amount", "last"), ("merchant_id", "count_distinct"),
])
card_txn_stats = StreamFeatureView(
    name="card_txn_stats",
    entities=[card],
    ttl=timedelta(days=2),
    source=_transactions("card_txn_stats"),
    aggregations=_card_aggs,
    schema=[Field(name="card_id", dtype=String), *_card_fields],
    timestamp_field="event_ts",
    online=True,
    offline=True,
    description="Spending per card over 5 minutes, 1 hour and 1 day",
)

_merchant_aggs, _merchant_fields = _aggregations([
    ("amount", "count"), ("amount", "sum"), ("amount", "mean"), ("amount", "max"),
    ("card_id", "count_distinct"),
])
merchant_txn_stats = StreamFeatureView(
    name="merchant_txn_stats",
    entities=[merchant],
    ttl=timedelta(days=2),
    source=_transactions("merchant_txn_stats"),
    aggregations=_merchant_aggs,
    schema=[Field(name="merchant_id", dtype=String), *_merchant_fields],
    timestamp_field="event_ts",
    online=True,
    offline=True,
    description="Traffic per merchant over 5 minutes, 1 hour and 1 day",
)

fraud_model_v1 = FeatureService(
    name="fraud_model_v1",
    features=[card_txn_stats, merchant_txn_stats],
    description="Every feature the fraud model scores a transaction with",
)
