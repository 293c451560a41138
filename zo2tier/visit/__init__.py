"""The block visit: bind the model's modules to block records, and run each block's visit in a forward.

``bindings`` ties each proxied module (a resident module, or a part of a decoder layer) to the record that
holds its weights. ``visits`` runs one block's visit on the fused GPU path (fetch, replay the pending
updates, write back per the visit's write plan, build θ±εz part by part). ``runner`` is what the proxies
call: it builds every copy's weights for the forward's groups and releases blocks to the tiers.
"""
