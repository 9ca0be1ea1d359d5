"""The Logic's markups: each target's positive and negative points nodes and its boxes (ROI nodes), referenced
from the segmentation node; drawing the agent's prompts, reading them back as the prompts of each slice, and
putting them back on undo.  A mixin of :class:`~MedSAMAgentLogic.logic.AgentLogic` (``self.scene``,
``self.contexts``, ``self._wake`` and the observers are the Logic's).

Coordinates: markups live in RAS (mm); prompts are in the pixels of the worker's slice picture
(:class:`~MedSAMAgentLib.slicer_support.geometry.VolumeGeometry` converts).
"""
import json

import vtk

import slicer

from MedSAMAgentLib.slicer_support.markup_plan import (
    BOX_COLOR,
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    markup_description,
    parse_description,
    point_label,
)
from MedSAMAgentLib.slicer_support.override import box_item, by_slice, point_item

ATTRIBUTE = "MedSAMAgent"  # node attribute holding a markup's origin (JSON)
MARKUPS_EVENTS = (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, slicer.vtkMRMLMarkupsNode.PointAddedEvent,
                  slicer.vtkMRMLMarkupsNode.PointRemovedEvent, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)


class MarkupNodes:
    """Markups of the Logic's contexts (see the module docstring)."""

    def pointsNode(self, ctx, positive, create=False):
        """The context's markups node of one sign (referenced from the segmentation node)."""
        role = f"MedSAMAgent{'Positive' if positive else 'Negative'}.{ctx.role}"
        node = ctx.segmentationNode.GetNodeReference(role)
        if node or not create:
            return node
        name = f"{ctx.target} {'positive' if positive else 'negative'} points"
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        color = POSITIVE_COLOR if positive else NEGATIVE_COLOR
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        display.SetActiveColor(*color)
        display.SetTextScale(2.0)
        node.SetAttribute(ATTRIBUTE, json.dumps({"medsam": 1, "positive": positive}))
        ctx.segmentationNode.SetNodeReferenceID(role, node.GetID())
        self._observeMarkups(ctx, node)
        return node

    def roiNodes(self, ctx):
        role = f"MedSAMAgentBox.{ctx.role}"
        nodes = []
        for n in range(ctx.segmentationNode.GetNumberOfNodeReferences(role)):
            node = ctx.segmentationNode.GetNthNodeReference(role, n)
            if node is not None:
                nodes.append(node)
        return nodes

    def _observeMarkups(self, ctx, node):
        events = [vtk.vtkCommand.ModifiedEvent]
        if isinstance(node, slicer.vtkMRMLMarkupsFiducialNode):
            events = list(MARKUPS_EVENTS)
        for event in events:
            if not self.hasObserver(node, event, self._onMarkupsModified):
                self.addObserver(node, event, self._onMarkupsModified)
        if not self.hasObserver(self.scene, self.scene.NodeRemovedEvent, self._onMarkupsModified):
            self.addObserver(self.scene, self.scene.NodeRemovedEvent, self._onMarkupsModified)

    def _onMarkupsModified(self, caller, event):
        if self._applying:
            return
        for ctx in self.contexts.values():
            ctx.markupsDirty = True
        self._wake()

    def _addRoi(self, ctx, axis, index, turn, run, author, objectToRas, size, name):
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        roi.CreateDefaultDisplayNodes()
        display = roi.GetDisplayNode()
        display.SetSelectedColor(*BOX_COLOR)
        display.SetColor(*BOX_COLOR)
        display.SetFillOpacity(0.05)
        self._placeRoi(roi, objectToRas, size)
        if self.run is not None or self._loading is not None:
            roi.SetLocked(True)  # like the other markups while the agent works (unlocked when it finishes)
        roi.SetAttribute(ATTRIBUTE, markup_description(axis, index, turn, run, author))
        ctx.segmentationNode.AddNodeReferenceID(f"MedSAMAgentBox.{ctx.role}", roi.GetID())
        self._observeMarkups(ctx, roi)
        return roi

    @staticmethod
    def _placeRoi(roi, objectToRas, size):
        """Orientation (columns 0-2), centre (column 3) and size (mm) of an ROI."""
        m = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                m.SetElement(r, c, float(objectToRas[r][c]))
        roi.SetAndObserveObjectToNodeMatrix(m)
        roi.SetCenter([float(objectToRas[r][3]) for r in range(3)])
        roi.SetSize(*[float(v) for v in size])

    def _addPoint(self, ctx, axis, index, turn, run, author, positive, ras, label):
        node = self.pointsNode(ctx, positive, create=True)
        n = node.AddControlPoint([float(v) for v in ras], label)
        node.SetNthControlPointDescription(n, markup_description(axis, index, turn, run, author))
        return node, node.GetNthControlPointID(n)

    def addBox(self, ctx, axis, index, box):
        """A box the annotator adds on a slice (pixel coordinates); the slice's mask is recomputed."""
        obj, size = ctx.geometry.box_to_roi(axis, index, box)
        self._addRoi(ctx, axis, index, None, "", "user", obj.tolist(), size.tolist(), f"{ctx.target} box s{index}-user")
        ctx.markupsDirty = True
        self._wake()

    def addPoint(self, ctx, axis, index, x, y, positive):
        """A point the annotator adds (pixel coordinates, as if placed in the view)."""
        ras = ctx.geometry.pixel_to_ras(axis, index, x, y)
        node = self.pointsNode(ctx, positive, create=True)
        node.AddControlPoint([float(v) for v in ras], point_label(index, None))
        ctx.markupsDirty = True
        self._wake()

    def _clearSliceMarkups(self, ctx, axis, index):
        for positive in (True, False):
            node = self.pointsNode(ctx, positive)
            if not node:
                continue
            for n in reversed(range(node.GetNumberOfControlPoints())):
                info = parse_description(node.GetNthControlPointDescription(n))
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPosition(n, pos)
                if info.get("axis", axis) == axis and round(ctx.geometry.ras_to_pixel(axis, pos)[2]) == index:
                    node.RemoveNthControlPoint(n)
        role = f"MedSAMAgentBox.{ctx.role}"
        for roi in self.roiNodes(ctx):
            centre = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())[:3, 3]
            sameAxis = parse_description(roi.GetAttribute(ATTRIBUTE)).get("axis", axis) == axis
            if sameAxis and round(ctx.geometry.ras_to_pixel(axis, centre)[2]) == index:
                for n in range(ctx.segmentationNode.GetNumberOfNodeReferences(role)):
                    if ctx.segmentationNode.GetNthNodeReferenceID(role, n) == roi.GetID():
                        ctx.segmentationNode.RemoveNthNodeReferenceID(role, n)
                        break
                self.scene.RemoveNode(roi)

    def _setMarkupsLocked(self, ctx, locked):
        for node in [self.pointsNode(ctx, True), self.pointsNode(ctx, False)] + self.roiNodes(ctx):
            if node:
                node.SetLocked(locked)

    def scanPrompts(self, ctx, axis=None):
        """The prompts on the markups now, by slice along ``axis`` (see override.by_slice).

        Markups placed for another axis are left out; a point the annotator placed is claimed for ``axis``
        the first time it is seen (labelled with its slice, described as the user's)."""
        axis = axis or ctx.axis
        pairs = []
        for positive in (True, False):
            node = self.pointsNode(ctx, positive)
            if not node:
                continue
            for n in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointPositionStatus(n) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                    continue
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPosition(n, pos)
                info = parse_description(node.GetNthControlPointDescription(n))
                item = point_item(ctx.geometry, axis if not info else info.get("axis", axis),
                                  f"{node.GetID()}/{node.GetNthControlPointID(n)}", pos, positive, info.get("turn"))
                if not info and item is not None:  # just placed by the annotator
                    node.SetNthControlPointDescription(n, markup_description(axis, item[0], None, "", "user"))
                    node.SetNthControlPointLabel(n, point_label(item[0], None))
                    info = {"axis": axis}
                if item is not None and info.get("axis") == axis:
                    pairs.append(item)
        for roi in self.roiNodes(ctx):
            info = parse_description(roi.GetAttribute(ATTRIBUTE))
            if info.get("axis", axis) != axis:
                continue
            objectToRas = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
            item = box_item(ctx.geometry, axis, roi.GetID(), objectToRas, list(roi.GetSize()), info.get("turn"))
            if item is not None:
                pairs.append(item)
        known = [s for (a, s) in ctx.overrides.editors if a == axis]
        return by_slice(pairs, known)

    def _restorePrompts(self, ctx, axis, index, items):
        """Put a slice's points and boxes back where they were before an override."""
        wanted = {i.id: i for i in items}
        current = self.scanPrompts(ctx, axis).get(index, [])
        for item in current:  # added since: remove
            if item.id not in wanted:
                self._removePrompt(item.id)
        for item in items:
            if item.kind == "box":
                roi = self.scene.GetNodeByID(item.id)
                obj, size = ctx.geometry.box_to_roi(axis, index, item.coords)
                if roi is None:
                    self._addRoi(ctx, axis, index, item.turn, "", item.author, obj.tolist(), size.tolist(),
                                 f"{ctx.target} box s{index}")
                else:
                    self._placeRoi(roi, obj, size)
            else:
                ras = ctx.geometry.pixel_to_ras(axis, index, *item.coords)
                nodeId, _, pid = item.id.partition("/")
                node = self.scene.GetNodeByID(nodeId)
                n = node.GetNthControlPointIndexByID(pid) if node else -1
                if n >= 0:
                    node.SetNthControlPointPosition(n, *[float(v) for v in ras])
                else:
                    self._addPoint(ctx, axis, index, item.turn, "", item.author, item.positive, ras,
                                   point_label(index, item.turn))

    def _removePrompt(self, pid):
        nodeId, _, cp = pid.partition("/")
        node = self.scene.GetNodeByID(nodeId)
        if node is None:
            return
        if cp:
            n = node.GetNthControlPointIndexByID(cp)
            if n >= 0:
                node.RemoveNthControlPoint(n)
        else:
            self.scene.RemoveNode(node)
