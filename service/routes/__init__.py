"""HTTP routes, one module per resource; ``ROUTERS`` is what the app includes."""

from service.routes import detect, embed, gallery, identify, strangers, system, verify

ROUTERS = (system.router, embed.router, verify.router, identify.router, detect.router, gallery.router, strangers.router)
