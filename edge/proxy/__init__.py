"""The request path: from a parsed body to the client's last byte."""
