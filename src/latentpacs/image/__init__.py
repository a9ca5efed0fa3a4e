"""What an image is on its way through latentpacs (DESIGN.md "Layout").

``pixels``  DICOM Pixel Data <-> pixel cells, stored values and the canonical image
``record``  the one image record (:class:`~latentpacs.image.record.ImageRecord`) and its model reference
``chain``   encode (data set -> record) and decode (record -> returned data set), the engine pool,
            and the transfer syntax a peer is sent
``derive``  the DICOM object a retrieval returns: derived identity and lossy attributes
``lpz``     the offline ``.lpz`` file, the twin of one archive row

Nothing here imports SQL or DICOM networking.
"""
