"""What the gateway and the worker processes share, and neither side owns.

The OpenAI HTTP surface over any Generate backend, the status codes of a Generate call, the
registry record and its Redis layout, and process logging. It imports neither side: the
worker must not depend on the gateway, nor the gateway on the worker or torch.
"""
