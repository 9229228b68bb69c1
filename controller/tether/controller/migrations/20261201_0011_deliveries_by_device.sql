-- The device inventory (ListDevices) reads each listed device's deliveries; the primary key
-- (release, device_id) cannot find them by device, so a page would scan the table per device.
CREATE INDEX deliveries_device ON deliveries (device_id);
