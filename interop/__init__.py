"""Imaging-AI interoperability hub: FHIR/HL7 in, Triton inference, FHIR/HL7 out."""
__version__ = "0.1.0"
