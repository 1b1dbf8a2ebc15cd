"""dino_fast.models"""
