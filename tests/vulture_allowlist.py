"""What vulture cannot see being used: names read by Jinja templates, called by gunicorn or by
prometheus_client, and the package's API the tests use (`vulture`, in `make test`, reads this file
with the package; it is never imported)."""
import tempfile

from flask import Flask, g

from inference_client import models, routing, triton
from interop import app
from interop.dicom import dicomweb, sr, views, volume
from interop.hl7 import mllp, order
from interop.ops.health import QueueCollector
from interop.runtime import processes
from interop.services.analytics import forecast
from interop.store import analytics, queue
from interop.web.waiting import Entry, FindingRow, Order

FindingRow.text_en, FindingRow.text_vi  # worklist/_findings.html
Entry.patient_identifier, Entry.waited_seconds, Entry.signed_by  # worklist/list.html, study.html
Order.sex, Order.ordering, Order.indication  # worklist/list.html, study.html (radiologists only)
g.audited  # flask.g, read back with g.get("audited") (interop.access)
QueueCollector.collect  # prometheus_client calls it on every scrape
Flask.session_interface  # set by interop.auth.routes for the OpenID Connect routes
app.create_app  # gunicorn: "interop.app:create_app()"

# API and value objects the tests read
models.ModelDescription.critical_labels, models.check_against_triton, routing.check_models_known
triton.TritonClient.is_ready, triton.TritonClient.model_ready
dicomweb.InstanceRef.image_position, dicomweb.InstanceRef.number_of_series_related_instances
views.ViewSpec.from_mapping, views.AssembledViews.instance_uids
volume.SeriesRules.from_mapping, volume.VolumeSpec.from_mapping, volume.facts_from_dataset, volume.BRAIN_CT_WINDOWS
mllp.Framer.in_frame
order.Order.requested_procedure_id, order.Order.scheduled_procedure_step_id, order.Order.station_name
order.Order.station_ae_titles, order.Order.requester
queue.series_jobs, queue.job_row
sr.to_bytes, sr.build_sr, sr.header_from, sr.header_from_fhir, sr.COMPREHENSIVE_3D_SR
# pynetdicom's AE settings and Flask's per-request body limit are read by those libraries
from pynetdicom import AE as _AE  # noqa: E402
from pynetdicom import _config  # noqa: E402

_AE.maximum_pdu_size, _AE.network_timeout, _AE.dimse_timeout, _AE.acse_timeout, _AE.maximum_associations
_AE.require_calling_aet, _config.STORE_RECV_CHUNKED_DATASET
from flask import Request as _Request  # noqa: E402

_Request.max_content_length
processes.wait_listening  # bench/mllp_throughput.py, bench/dicom_store.py
tempfile.tempdir  # read by the tempfile module (pynetdicom's received files; interop.workers.dicom_scp)

# used by the checkout's scripts (the seeding of synthetic analytics data), and dataclasses.asdict
analytics.SYNTHETIC_COLUMNS, analytics.synthetic_start, analytics.synthetic_count
forecast.Forecast.history
