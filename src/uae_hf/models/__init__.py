from .projector import UAEProjector
