"""Serving: the OpenAI-style server and its web page (server, web/), best-of-N (rerank) and the
feedback store that turns users' ratings into training data (feedback).
"""
